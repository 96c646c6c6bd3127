"""The data layer: canonical records, readers, validation, filters, versioning and pipelines."""
