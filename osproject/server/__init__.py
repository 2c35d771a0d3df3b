"""The server wing: one select() loop, its sessions, the untrusted workers."""
