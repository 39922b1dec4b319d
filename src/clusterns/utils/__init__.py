"""Small helpers shared by every stage: atomic files and provenance records."""
