from django.apps import AppConfig


class FeedbackConfig(AppConfig):
    name = "rlhf.feedback.web"
    label = "feedback"
    verbose_name = "Feedback"
    default_auto_field = "django.db.models.AutoField"
