"""Choosing the global strength α: without labels (`alpha: auto`) and with them (`tune`)."""
