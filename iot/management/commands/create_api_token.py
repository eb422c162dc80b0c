from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from rest_framework.authtoken.models import Token


class Command(BaseCommand):
    help = "Create the user if needed and print an API token (the last line of stdout)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--superuser", action="store_true", help="Make the user a superuser (admin access).")

    def handle(self, *args, username, superuser, **options):
        user, created = get_user_model().objects.get_or_create(username=username)
        if created:
            user.set_unusable_password()
        if superuser:
            user.is_staff = user.is_superuser = True
        if created or superuser:
            user.save()
        token, _ = Token.objects.get_or_create(user=user)
        self.stderr.write(f"{'Created' if created else 'Existing'} user {username!r}.")
        self.stdout.write(token.key)
