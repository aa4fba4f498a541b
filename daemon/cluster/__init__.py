"""Several daemons sharing providers through Redis (DINFER_REDIS_URL): see node.py."""
