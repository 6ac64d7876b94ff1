"""Validates JSON documents against a JSON Schema: one result line per
document, {"ok": true} or {"ok": false, "errors": [...]}.

    python fleet_schema_check.py SCHEMA DOC.json...
"""
import json
import sys

import jsonschema

schema = json.load(open(sys.argv[1]))
jsonschema.Draft202012Validator.check_schema(schema)
validator = jsonschema.Draft202012Validator(schema)
for path in sys.argv[2:]:
    doc = json.load(open(path))
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
    print(json.dumps({"ok": not errors, "errors": errors}))
