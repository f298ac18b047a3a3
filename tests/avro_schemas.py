"""The old smart-grid service's Avro schemas (namespace com.smartgrid.analytics, subjects
``<topic>-value``), for the tests that produce Confluent-framed Avro events."""

from __future__ import annotations

SENSOR_DATA = {
  "type": "record",
  "name": "SensorData",
  "namespace": "com.smartgrid.analytics",
  "fields": [
    {"name": "event_id", "type": "string"},
    {"name": "sensor_id", "type": "string"},
    {"name": "sensor_type", "type": "string"},
    {"name": "value", "type": "double"},
    {
      "name": "location",
      "type": {
        "type": "record",
        "name": "Location",
        "fields": [{"name": "lat", "type": "double"}, {"name": "lon", "type": "double"}],
      },
    },
    {"name": "timestamp", "type": "string"},
    {"name": "metadata", "type": {"type": "map", "values": "string"}, "default": {}},
  ],
}

METER_READING = {
  "type": "record",
  "name": "MeterReading",
  "namespace": "com.smartgrid.analytics",
  "fields": [
    {"name": "event_id", "type": "string"},
    {"name": "meter_id", "type": "string"},
    {"name": "customer_id", "type": "string"},
    {"name": "reading", "type": "double"},
    {"name": "unit", "type": "string", "default": "kWh"},
    {"name": "timestamp", "type": "string"},
  ],
}
