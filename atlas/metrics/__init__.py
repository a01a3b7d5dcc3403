"""Pure metrics: numpy/torch in, arrays out. No database, no I/O, no model loading."""
