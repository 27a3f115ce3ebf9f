# /root/.profile of the images the cocker scripts build (the C cocker's template)
export PATH=.:/bin:/sbin:/usr/bin:/usr/sbin:/usr/local/bin:/usr/local/sbin
alias l='ls -l'
alias ll='ls -lF'
alias lf='ls -F'
alias lrt='ls -lrt'
alias rm='rm -i'
alias mv='mv -i'
alias cp='cp -i'
alias view='vi -R'
set -o vi
PS1='[\u@\h $PWD] '
