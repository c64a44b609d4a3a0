"""The stages every upstream request goes through, and the HTTP client."""
