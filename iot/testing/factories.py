"""Users and operator tokens for in-process tests, with unique names so tests never collide.

Domain objects come from their app's own kit (`devices/testing.py`): `iot/` imports no domain app.
"""

import uuid
from collections.abc import Iterable

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractUser, Permission
from rest_framework.authtoken.models import Token


def user_create(
    *, username: str | None = None, staff: bool = False, superuser: bool = False, permissions: Iterable[str] = ()
) -> AbstractUser:
    """A user without a usable password (`username` defaults to `user-<8 hex>`), holding the permissions
    named by codename (e.g. `view_idempotencykey`)."""
    user = get_user_model()(
        username=username or f"user-{uuid.uuid4().hex[:8]}", is_staff=staff or superuser, is_superuser=superuser
    )
    user.set_unusable_password()
    user.save()
    codenames = list(permissions)
    if codenames:
        found = list(Permission.objects.filter(codename__in=codenames))
        assert len(found) == len(codenames), f"unknown permission among {codenames}"
        user.user_permissions.add(*found)
    return user


def operator_token_create(*, username: str | None = None, staff: bool = False) -> Token:
    """An operator's API token (what `manage.py create_api_token` gives), its user created if needed."""
    user, created = get_user_model().objects.get_or_create(
        username=username or f"operator-{uuid.uuid4().hex[:8]}", defaults={"is_staff": staff}
    )
    if created:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    token, _ = Token.objects.get_or_create(user=user)
    return token
