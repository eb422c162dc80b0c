"""`Authorization: Device <token>`: a device authenticates as itself."""

from dataclasses import dataclass
from uuid import UUID

from rest_framework import authentication, exceptions

from devices.models import DeviceStatus
from devices.selectors import device_get_by_token_hash
from devices.services import device_token_hash


@dataclass(frozen=True)
class DevicePrincipal:
    """`request.user` for a request made with a device credential."""

    device_id: UUID
    serial_number: str
    is_device: bool = True
    is_authenticated: bool = True
    is_active: bool = True
    is_staff: bool = False
    is_superuser: bool = False
    pk = None

    def __str__(self) -> str:
        return f"device {self.serial_number}"


class DeviceTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Device"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].decode(errors="replace") != self.keyword:
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Invalid device credential header: expected 'Device <token>'.")
        try:
            token = header[1].decode()
        except UnicodeDecodeError as exc:
            raise exceptions.AuthenticationFailed("Invalid device token.") from exc
        device = device_get_by_token_hash(token_hash=device_token_hash(token))
        if device is None:
            raise exceptions.AuthenticationFailed("Invalid device token.")
        if device.status == DeviceStatus.DECOMMISSIONED:
            raise exceptions.AuthenticationFailed("This device is decommissioned.")
        return DevicePrincipal(device_id=device.pk, serial_number=device.serial_number), token

    def authenticate_header(self, request):
        return self.keyword
