"""`kiln serve`: an HTTP gateway over a pool of resident llama.cpp servers fed by the registry."""
