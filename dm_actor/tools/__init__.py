"""Client tools that ship with the server but talk to it as any client does (over its
sockets): `dm-actor watch`. Not part of the server: nothing under `dm_actor` imports this
package but `cli.py`."""
