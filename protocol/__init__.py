"""The wire contract shared by the daemon and the provider node.

`messages` holds the frames of PROTOCOL.md §5, `crypto` the key handling and NaCl boxes of
§2-3, `sse` the server-sent-event parsing and boilerplate/content classification of §6, and
`toolschema` the repair of tool schemas that chat templates choke on.
"""
