"""Who may call what: operators (users) versus devices (device tokens)."""

from rest_framework import exceptions
from rest_framework.authentication import get_authorization_header
from rest_framework.permissions import BasePermission

# What to send, as the 401 names it (the header is `Authorization: <scheme> <credential>`).
OPERATOR_ONLY = "'Token <key>'"
OPERATOR_OR_DEVICE = "'Token <key>' (operators) or 'Device <token>' (devices)"


def is_device(user) -> bool:
    return getattr(user, "is_device", False)


def _refuse_unauthenticated(request, accepted: str) -> bool:
    """Raise the 401 that tells the caller which credentials to send.

    DRF's own answer to a request no authenticator recognised is "credentials were not
    provided", also for `Authorization: Bearer x` (every authenticator passes on a scheme
    it does not know), which sent new users looking for a token they had already sent.
    Raised here, where DRF would raise its `NotAuthenticated`, so the answer stays a 401
    with `WWW-Authenticate`; an endpoint that needs no credentials never gets here.
    """
    if not request.authenticators:
        return False  # no authentication on this view: DRF answers 403
    header = get_authorization_header(request).split()
    if header:
        scheme = header[0].decode(errors="replace")[:32]
        raise exceptions.AuthenticationFailed(f"Unsupported authorization scheme '{scheme}'; use {accepted}.")
    raise exceptions.NotAuthenticated(
        f"Authentication credentials were not provided; send an Authorization header with {accepted}."
    )


class IsOperator(BasePermission):
    """An authenticated human or integration account; devices are refused."""

    message = "This endpoint is for operators; device credentials are not accepted here."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return _refuse_unauthenticated(request, OPERATOR_ONLY)
        return not is_device(user)


class IsOperatorOrDevice(BasePermission):
    """Operators, or a device; views then restrict a device to its own resources."""

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return _refuse_unauthenticated(request, OPERATOR_OR_DEVICE)
        return True
