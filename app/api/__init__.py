"""The A1111-compatible HTTP API (`/sdapi/v1`)."""
