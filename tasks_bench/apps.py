from django.apps import AppConfig


class TasksBenchConfig(AppConfig):
    name = "tasks_bench"
    verbose_name = "Bug-fix benchmark tasks (the seed's ten scenarios)"
