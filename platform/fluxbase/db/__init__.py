"""Database access: the control-plane pool, migrations, and tenant roles and pools."""
