# /etc/profile of the images the cocker scripts build (the C cocker's template)
set -o vi
export PATH=.:/bin:/sbin:/usr/bin:/usr/sbin:/usr/local/bin
export TERM=${TERM:-xterm}
echo "--- Welcome to cocker contrainer ---"
echo ""
