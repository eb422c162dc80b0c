"""The embedded MQTT broker (`python -m mqtt.broker`): what `make run` and the live tests start when
`MQTT_URL` is unset. amqtt (asyncio, MQTT 3.1.1) with the fixes and the shared subscriptions of
`mqtt.broker.server`, asking the platform's `POST /mqtt/auth` and `/mqtt/acl` who may do what
(`mqtt.broker.plugin`). It imports no Django: a process of its own, light to start and restart.
"""
