"""/admin: browse items and ratings (read-only: ratings are evidence, not something to edit)."""

from django.contrib import admin

from rlhf.feedback.web.models import Item, Rating


class ReadOnly(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Rating)
class RatingAdmin(ReadOnly):
    list_display = ("id", "created_at", "rater", "mode", "item_id", "choice", "undone_at", "model", "checkpoint")
    list_filter = ("mode", "choice", "rater", "model")
    search_fields = ("rater", "item_id", "prompt", "shown")


@admin.register(Item)
class ItemAdmin(ReadOnly):
    list_display = ("key", "mode", "prompt", "model", "checkpoint", "added_at")
    list_filter = ("mode", "model")
    search_fields = ("key", "prompt", "responses")
