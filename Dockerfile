# The atlas (CLI, jobs and app) in one image, built once: `docker compose build` or `docker build -t neuron-atlas .`
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /src

# Dependencies first, from pyproject.toml alone, so a code change does not reinstall torch.
# The CPU build of torch: a CUDA build is gigabytes (use a CUDA base image to run jobs on a GPU).
COPY pyproject.toml README.md ./
RUN mkdir -p atlas ingest app migrations && touch atlas/__init__.py ingest/__init__.py app/__init__.py migrations/__init__.py \
 && pip install --extra-index-url https://download.pytorch.org/whl/cpu . \
 && pip uninstall -y neuron-atlas

COPY atlas atlas
COPY ingest ingest
COPY app app
COPY migrations migrations
RUN pip install --no-deps .

# The app binds every interface inside the container; compose publishes it on 127.0.0.1 only.
EXPOSE 8501
ENTRYPOINT ["atlas"]
CMD ["app", "--port", "8501"]
