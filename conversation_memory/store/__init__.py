"""Persistence: tables (``schema``), connections (``database``), queries
(``repository``) and migrations (``migrate``). Nothing above the engine
imports from here."""
