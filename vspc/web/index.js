// The VM list's script (a file of its own: the pages' Content-Security-Policy
// allows no inline script). Carry ?token= into the refresh link as well.
document.querySelector('a[href=""]').href = location.href;
