"""Files installed with the package: the demo teacher (`demo.shipped_teacher`) and its record."""
