"""mlfe data plane: the scoring path (asyncio.Protocol + httptools), admission, routing."""
