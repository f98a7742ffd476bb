#!/usr/bin/env bash
# The MLflow tracking server for a team: runs and the model registry in PostgreSQL, artifacts (GGUF
# files, checkpoints, reports) in S3-compatible storage (AWS S3, MinIO, Ceph RGW). With
# --serve-artifacts the server alone holds the bucket's credentials: kiln uploads and downloads
# through it (mlflow-artifacts:/ URIs), as on `make services`. The server needs boto3.
set -euo pipefail
: "${MLFLOW_DATABASE_URL:?postgresql+psycopg2://kiln:PASSWORD@db-host:5432/mlflow}"
: "${AWS_ACCESS_KEY_ID:?}" "${AWS_SECRET_ACCESS_KEY:?}"
export MLFLOW_S3_ENDPOINT_URL="${MLFLOW_S3_ENDPOINT_URL:-https://minio.internal:9000}"  # unset for AWS S3
exec mlflow server \
  --backend-store-uri "$MLFLOW_DATABASE_URL" \
  --serve-artifacts --artifacts-destination "${KILN_ARTIFACT_BUCKET:-s3://kiln-artifacts/mlflow}" \
  --host 0.0.0.0 --port 5000 --workers 4 \
  --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-mlflow.internal,mlflow.internal:5000,localhost:5000}"
