# Prints a file's length and SHA-256 as one line of JSON, so a download can be sized and checked.
param(
    [Parameter(Mandatory = $true)][string]$Path
)
$ErrorActionPreference = 'Stop'
$item = Get-Item -LiteralPath $Path
if ($item.PSIsContainer) {
    throw "$Path is a directory"
}
[ordered]@{
    length = $item.Length
    sha256 = (Get-FileHash -LiteralPath $Path -Algorithm SHA256).Hash
} | ConvertTo-Json -Compress
