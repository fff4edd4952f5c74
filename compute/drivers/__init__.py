"""Instance drivers: one per isolation technology."""
