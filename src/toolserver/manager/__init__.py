"""The manager: sessions, routing to nodes, records and the node checker."""
