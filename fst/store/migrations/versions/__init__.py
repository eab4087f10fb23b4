"""Migration scripts, oldest first. Hand-written: review every change to the models here."""
