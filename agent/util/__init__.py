"""Small helpers with no torchwarm policy in them: files, HTTP endpoint, progress."""
