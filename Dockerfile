# One image for the API, the worker, beat and the migration job.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY domain ./domain
COPY infrastructure ./infrastructure
COPY workers ./workers
COPY protocols ./protocols
RUN pip install --no-cache-dir .
# The installed package has no protocols/ beside it: name the file the image carries.
ENV TRIALOG_PROTOCOL=/app/protocols/nct04205786.toml
RUN useradd --create-home trialog
USER trialog
