"""Domain services: business rules over the database; no HTTP types here."""
