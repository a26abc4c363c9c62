"""Simulated LwM2M clients: many devices per process, built on the same sans-IO coap/ and lwm2m/.

`objects` holds each device's LwM2M objects and notification rules (pure), `client` one
device's protocol behaviour over an injected network (pure but for the `Network` it calls),
`fleet` the sockets, the timer heap and the one task that drive them all, and `cli` the
`dm-actor simulate` command. The simulator never imports the server's actors or API: it talks
to the server over sockets only.
"""
