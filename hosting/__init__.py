"""What a dinfer process needs from the host that runs it (today: systemd's notify protocol).

Beside `protocol/` at the bottom of the layers: the daemon and the provider node both use it
and must not import each other, and it is not part of the wire protocol.
"""
