"""Traffic for the L4 A/B path: traffic types, simulated users, the simulator, and the event-log schema with
its JSONL importer (real logs and simulated windows feed the same KPI code)."""
