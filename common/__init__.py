"""fastserve common: configuration, message schemas, bus, logging, metrics and the CLI."""
