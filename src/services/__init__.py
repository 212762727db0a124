"""Service layer: one module per resource. Each public function owns its transaction (commit on success,
rollback on error), raises domain errors from `src.errors`, and returns plain data, never ORM objects."""
