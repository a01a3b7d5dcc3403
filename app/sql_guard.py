"""The SQL console's guard: one read-only statement, or a refusal that says why.

A pure function, so it is unit-tested without Streamlit. The guard is the first line only: the
console also runs on a read-only connection (SQLite mode=ro + query_only, PostgreSQL READ ONLY
transaction), so a statement that slips past the guard still cannot write.
"""

from __future__ import annotations

import re

from atlas.errors import AtlasError

# Statements a read-only console may start with.
ALLOWED_FIRST_WORDS = frozenset({"SELECT", "WITH", "VALUES", "EXPLAIN", "PRAGMA", "TABLE", "SHOW"})

# Words that write, change the schema or the session, wherever they appear outside strings and
# quoted identifiers (WITH ... DELETE, EXPLAIN ANALYZE UPDATE, SELECT ... INTO new_table).
FORBIDDEN_WORDS = frozenset({
    "DROP", "DELETE", "UPDATE", "INSERT", "ALTER", "CREATE", "ATTACH", "DETACH", "VACUUM", "TRUNCATE",
    "GRANT", "REVOKE", "REINDEX", "MERGE", "UPSERT", "COPY", "INTO", "CALL", "DO", "LOCK",
    "COMMIT", "ROLLBACK", "BEGIN", "SAVEPOINT", "RELEASE", "SET", "RESET", "NOTIFY", "LISTEN",
    "REFRESH", "CLUSTER", "COMMENT", "SECURITY", "PREPARE", "EXECUTE", "DEALLOCATE", "DISCARD",
    "IMPORT", "LOAD",
})

# SQLite pragmas that only read. The paren form PRAGMA name(x) SETS a value for most pragmas, so it
# is allowed only where the argument names a table or an index.
PRAGMAS_WITH_ARGUMENT = frozenset({
    "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
    "foreign_key_list", "foreign_key_check", "integrity_check", "quick_check",
})
PRAGMAS_WITHOUT_ARGUMENT = PRAGMAS_WITH_ARGUMENT | frozenset({
    "database_list", "collation_list", "function_list", "module_list", "pragma_list", "compile_options",
    "encoding", "page_count", "page_size", "freelist_count", "user_version", "schema_version", "application_id",
})

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


class SqlRefused(AtlasError):
    """The console will not run this text; the message says why and what it accepts."""


def _mask_literals(sql: str) -> str:
    """Blank out comments, string literals and quoted identifiers, keeping the text's length.

    What remains is the SQL's own words and punctuation, so keyword and ';' checks cannot be
    fooled by 'DROP' inside a string, nor a '--' comment hide a second statement.
    """
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end == -1 else end
            out.append(" " * (end - i))
            i = end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            if end == -1:
                raise SqlRefused("refused: unterminated /* comment; close it with */")
            out.append(" " * (end + 2 - i))
            i = end + 2
        elif ch in "'\"`[":
            closer = {"[": "]"}.get(ch, ch)
            j = i + 1
            while True:
                j = sql.find(closer, j)
                if j == -1:
                    raise SqlRefused(f"refused: unterminated quote {ch}...; close it with {closer}")
                if closer != "]" and sql.startswith(closer * 2, j):  # doubled quote escapes itself
                    j += 2
                    continue
                break
            # A quoted identifier still counts as a name (so "x" is not a keyword); keep a placeholder.
            out.append(("''" if ch == "'" else "q") + " " * (j + 1 - i - (2 if ch == "'" else 1)))
            i = j + 1
        elif ch == "$" and (match := _DOLLAR_TAG.match(sql, i)) and (i == 0 or not (sql[i - 1].isalnum() or sql[i - 1] == "_")):
            tag = match.group(0)
            end = sql.find(tag, match.end())
            if end == -1:
                raise SqlRefused(f"refused: unterminated dollar-quoted string {tag}; close it with {tag}")
            out.append("''" + " " * (end + len(tag) - i - 2))
            i = end + len(tag)
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _check_pragma(code: str) -> None:
    if "=" in code:
        raise SqlRefused("refused: PRAGMA with '=' changes the database; the console only reads")
    has_argument = "(" in code
    names = _WORD.findall(code.split("(", 1)[0])[1:]
    name = names[-1].lower() if names else ""
    allowed = PRAGMAS_WITH_ARGUMENT if has_argument else PRAGMAS_WITHOUT_ARGUMENT
    if name not in allowed:
        raise SqlRefused(
            f"refused: PRAGMA {name}{'(...)' if has_argument else ''} is not a read-only pragma here; "
            f"allowed: {', '.join(sorted(PRAGMAS_WITHOUT_ARGUMENT))}"
        )


def check_read_only_sql(sql: str) -> str:
    """Return the single statement to run (trailing ';' removed), or raise SqlRefused.

    Refuses: several statements, any statement that does not start as a query (SELECT, WITH,
    VALUES, EXPLAIN, read-only PRAGMA), and any writing keyword outside strings and quoted names.
    """
    code = _mask_literals(sql)
    statements = [part for part in code.split(";") if part.strip()]
    if not statements:
        raise SqlRefused("refused: the query is empty; write one SELECT statement")
    if len(statements) > 1:
        raise SqlRefused("refused: several statements in one go; run one statement at a time")
    statement = statements[0]
    words = [w.upper() for w in _WORD.findall(statement)]
    first = words[0] if words else ""
    if first not in ALLOWED_FIRST_WORDS:
        raise SqlRefused(
            f"refused: {first or 'this statement'} is not a query; the console is read-only "
            "(SELECT, WITH, VALUES, EXPLAIN, read-only PRAGMA)"
        )
    forbidden = sorted(set(words) & FORBIDDEN_WORDS)
    if forbidden:
        raise SqlRefused(f"refused: {', '.join(forbidden)} is not allowed; the console is read-only")
    if first == "PRAGMA":
        _check_pragma(statement)
    # Keep the user's text (strings intact), cut at the statement's end: the trailing ';' and comments.
    start = code.index(statement)
    return sql[start:start + len(statement)].strip()
