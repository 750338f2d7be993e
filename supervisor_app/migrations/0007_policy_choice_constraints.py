from django.db import migrations
from django.db.models import Q

from supervisor_app.compat import check_constraint

OVERLAP = ["allow", "skip", "queue_one", "replace"]
CATCH_UP = ["none", "latest", "all"]


def normalise(apps, schema_editor):
    """Rows written before the constraint: a known value in another case or with spaces is kept
    (lower-cased, stripped); anything else becomes empty, i.e. the SUPERVISOR_ setting, as the admin
    would show it. Before, an unknown overlap value acted as `replace` (cancelling active runs)."""
    Policy = apps.get_model("supervisor_app", "SupervisionPolicy")
    for field, allowed in (("overlap", OVERLAP), ("catch_up", CATCH_UP)):
        for pk, value in Policy.objects.exclude(**{f"{field}__in": ["", *allowed]}).values_list("pk", field):
            cleaned = (value or "").strip().lower()
            Policy.objects.filter(pk=pk).update(**{field: cleaned if cleaned in allowed else ""})


class Migration(migrations.Migration):
    dependencies = [
        ("supervisor_app", "0006_adopted_message"),
    ]

    operations = [
        migrations.RunPython(normalise, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name="supervisionpolicy",
            constraint=check_constraint(Q(overlap__in=["", *OVERLAP]), "supervisor_policy_overlap_valid"),
        ),
        migrations.AddConstraint(
            model_name="supervisionpolicy",
            constraint=check_constraint(Q(catch_up__in=["", *CATCH_UP]), "supervisor_policy_catch_up_valid"),
        ),
    ]
