"""Who may call what: operators (users) versus devices (device tokens)."""

from rest_framework.permissions import BasePermission


def is_device(user) -> bool:
    return getattr(user, "is_device", False)


class IsOperator(BasePermission):
    """An authenticated human or integration account; devices are refused."""

    message = "This endpoint is for operators; device credentials are not accepted here."

    def has_permission(self, request, view) -> bool:
        user = request.user
        return bool(user and user.is_authenticated and not is_device(user))


class IsOperatorOrDevice(BasePermission):
    """Operators, or a device; views then restrict a device to its own resources."""

    def has_permission(self, request, view) -> bool:
        user = request.user
        return bool(user and user.is_authenticated)
