"""The gRPC client: settings, one core with blocking and asyncio wrappers, error mapping, post and result types."""
