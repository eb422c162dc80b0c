import io

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from rest_framework.authtoken.models import Token

pytestmark = pytest.mark.django_db


def run(*args) -> str:
    out = io.StringIO()
    call_command("create_api_token", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue().strip().splitlines()[-1]


def test_create_api_token_creates_user_and_is_stable():
    key = run("integration")
    assert Token.objects.get(user__username="integration").key == key
    assert run("integration") == key
    user = get_user_model().objects.get(username="integration")
    assert not user.is_superuser and not user.has_usable_password()


def test_create_api_token_superuser():
    run("root-ops", "--superuser")
    user = get_user_model().objects.get(username="root-ops")
    assert user.is_superuser and user.is_staff
