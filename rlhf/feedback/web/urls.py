from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path

from rlhf.feedback.web import views

urlpatterns = [
    path("", views.index),
    path("rate", views.rate),
    path("undo", views.undo),
    path("api/items", views.api_items),
    path("api/ratings", views.api_ratings),
    path("login/", auth_views.LoginView.as_view(template_name="feedback/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("static/<path:path>", views.static),
]
