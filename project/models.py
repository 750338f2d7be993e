from django.db import models


class Execution(models.Model):
    """Demo/test side effect: one row each time a demo task body reaches its end."""

    run_id = models.BigIntegerField(null=True)
    attempt = models.PositiveIntegerField(null=True)
    label = models.CharField(max_length=100, blank=True, default="")
    worker = models.CharField(max_length=255, blank=True, default="")
    pid = models.IntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.label} run {self.run_id} attempt {self.attempt} on {self.worker}"
