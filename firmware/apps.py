from django.apps import AppConfig


class FirmwareConfig(AppConfig):
    name = "firmware"

    def ready(self):
        from firmware.saga import FIRMWARE_UPDATE_SAGA
        from iot.saga import saga_register

        # Updates are run by the durable step runner; it finds the steps by the run's name.
        saga_register(definition=FIRMWARE_UPDATE_SAGA)
