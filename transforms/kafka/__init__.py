"""A native Python Kafka source for Beam, on kafka-python.

Modules: ``records`` (values), ``config`` (consumer settings), ``client`` (the
client config shape and ``new_consumer``), ``positions`` (start and
stop), ``tracking`` (restrictions and backlog), ``watermark``, ``drain`` (local drain
signal), ``read`` (the splittable DoFn and the public transforms).
"""

from transforms.kafka.client import KafkaUnavailableError, new_consumer
from transforms.kafka.read import (
  ReadFromKafka,
  ReadPartitions,
  ResolvePartitions,
  UnknownTopicError,
  discover_partitions,
)
from transforms.kafka.records import KafkaRecord, PartitionRead

__all__ = [
  "KafkaRecord",
  "PartitionRead",
  "ReadFromKafka",
  "ReadPartitions",
  "ResolvePartitions",
  "KafkaUnavailableError",
  "UnknownTopicError",
  "discover_partitions",
  "new_consumer",
]
