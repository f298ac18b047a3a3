"""Installs the pipeline's packages; also Dataflow's --setup_file for its workers."""

import setuptools

setuptools.setup(
  name="smartgrid-pipeline",
  version="0.1.0",
  description="Smart-grid Kafka -> Beam -> SQLite/BigQuery pipeline that never loses an event",
  packages=setuptools.find_packages(
    include=["pipelines", "pipelines.*", "transforms", "transforms.*"]
  ),
  python_requires=">=3.10",
  # Workers need these; the exact pins live in requirements.txt.
  install_requires=[
    "kafka-python>=3.0.12,<4",
    "crc32c",
    "python-snappy",
    "lz4",
    "aiokafka>=0.14,<0.15",  # its compiled record decoder (a private module: a narrow range)
    "confluent-kafka[avro,schemaregistry]>=2.16,<3",
    "fastavro>=1.13,<2",
    "google-cloud-bigquery>=3.47,<4",
    "google-cloud-bigquery-storage>=2.43,<3",
    "tenacity>=9,<10",
    "msgspec>=0.22,<1",
  ],
)
