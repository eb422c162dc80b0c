"""Operators' view of saga runs and their step logs, read-only: a run changes only through the runner
(an edited row would skip or repeat steps), and is cancelled by its owning app's own action."""

from django.contrib import admin

from iot.saga.models import SagaRun, SagaStepLog


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class SagaStepLogInline(admin.TabularInline):
    model = SagaStepLog
    fields = ("index", "name", "phase", "status", "attempts", "error", "started_at", "finished_at")
    readonly_fields = fields
    ordering = ("id",)
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(SagaRun)
class SagaRunAdmin(ReadOnlyAdmin):
    list_display = ("id", "name", "key", "status", "phase", "step_index", "attempts", "next_run_at", "created_at")
    list_filter = ("status", "name", "phase")
    search_fields = ("=id", "=key")
    search_help_text = "Search by a run's exact id or key."
    readonly_fields = [field.name for field in SagaRun._meta.fields]
    inlines = [SagaStepLogInline]
    list_per_page = 100
    show_full_result_count = False


@admin.register(SagaStepLog)
class SagaStepLogAdmin(ReadOnlyAdmin):
    list_display = ("run", "index", "name", "phase", "status", "attempts", "started_at", "finished_at")
    list_filter = ("status", "phase")
    list_select_related = ("run",)
    search_fields = ("=run__id", "name")
    readonly_fields = [field.name for field in SagaStepLog._meta.fields]
    list_per_page = 100
    show_full_result_count = False
