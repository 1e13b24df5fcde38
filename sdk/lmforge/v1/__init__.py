"""Generated from protos/lmforge/v1 by tools/genproto.py; do not edit."""
