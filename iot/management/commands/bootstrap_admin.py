import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "On a new installation, create an `admin` superuser and say how to log in (used by `make run`)."

    def handle(self, *args, **options):
        users = get_user_model().objects
        credentials = settings.BASE_DIR / "var" / "admin-credentials.txt"
        if users.filter(is_superuser=True).exists():
            hint = f" (first password in {credentials})" if credentials.exists() else ""
            self.stdout.write(f"  Log in with your superuser account{hint}.")
            return
        password = secrets.token_urlsafe(12)
        users.create_superuser(username="admin", email="", password=password)
        credentials.parent.mkdir(parents=True, exist_ok=True)
        credentials.write_text(f"username: admin\npassword: {password}\n")
        credentials.chmod(0o600)
        self.stdout.write(f"  Created superuser 'admin' with password {password!r} (also in {credentials}).")
