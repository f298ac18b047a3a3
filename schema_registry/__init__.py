"""A local Confluent-compatible schema registry (Apicurio Registry) for tests and local trials."""
